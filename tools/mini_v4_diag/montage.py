import sys,glob
from PIL import Image
d,cols,out=sys.argv[1],int(sys.argv[2]),sys.argv[3]
fs=sorted(glob.glob(d+'/*.png'))
ims=[Image.open(f) for f in fs]
w,h=ims[0].size; rows=(len(ims)+cols-1)//cols
m=Image.new('RGB',(cols*(w+2),rows*(h+2)),'white')
for i,im in enumerate(ims): m.paste(im,((i%cols)*(w+2),(i//cols)*(h+2)))
m=m.resize((m.width*3,m.height*3),Image.NEAREST); m.save(out)
